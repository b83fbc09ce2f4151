"""The Pyro releases this library is tested on, and the check that refuses any other.

``decompose`` and the ``TermsTrace_ELBO`` recorders read Pyro's traces the way Pyro's
``Trace_ELBO`` and ``TraceMeanField_ELBO`` build them; those internals are checked against the
releases from :data:`PYRO_MIN` to :data:`PYRO_MAX` only.  On any other release they raise
:class:`UntestedPyroError` when called or constructed (never at import time).  To run anyway,
at your own risk, set the environment variable ``ELBO_TERMS_ALLOW_UNTESTED_PYRO=1``.
"""

from __future__ import annotations

import functools
import os
import re

#: the oldest and the newest Pyro release the library is tested on (inclusive)
PYRO_MIN = "1.8.6"
PYRO_MAX = "1.9.2"
#: the torch release the library is tested with
TORCH_TESTED = "2.13.0"
#: set this environment variable to "1" to run on a Pyro outside the range
ALLOW_ENV = "ELBO_TERMS_ALLOW_UNTESTED_PYRO"


class UntestedPyroError(RuntimeError):
    """The installed Pyro is outside the range the library is tested on."""


def _release(version: str) -> tuple:
    """``"1.9.2"`` -> ``(1, 9, 2)``; a pre-release or local suffix is ignored (``"1.9.1+abc"`` -> ``(1, 9, 1)``)."""
    m = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if not m:
        raise ValueError(f"cannot read the version string {version!r}")
    return tuple(int(p or 0) for p in m.groups())


@functools.lru_cache(maxsize=8)
def _tested(version: str) -> bool:
    return _release(PYRO_MIN) <= _release(version) <= _release(PYRO_MAX)


def check_pyro_version(who: str, version: str | None = None) -> None:
    """Raise :class:`UntestedPyroError` when Pyro's version is outside ``PYRO_MIN .. PYRO_MAX``.

    ``who`` names the caller in the message; ``version`` defaults to ``pyro.__version__``.
    Set the environment variable ``ELBO_TERMS_ALLOW_UNTESTED_PYRO=1`` to skip the check.
    """
    if os.environ.get(ALLOW_ENV, "") == "1":
        return
    if version is None:
        import pyro

        version = pyro.__version__
    if _tested(version):
        return
    raise UntestedPyroError(
        f"{who} is tested with pyro-ppl {PYRO_MIN} to {PYRO_MAX}, but pyro-ppl {version} is installed. "
        "It reads the traces Trace_ELBO builds, whose details may differ in other releases, so it refuses "
        f"rather than risk a wrong number. Install a tested release (pip install 'pyro-ppl>={PYRO_MIN},<={PYRO_MAX}'), "
        f"or set the environment variable {ALLOW_ENV}=1 to run anyway at your own risk."
    )
