"""Sphinx extension: execute the book's notebooks in parallel, ahead of reading them.

myst-nb (``nb_execution_mode = "cache"``) executes a notebook while Sphinx reads its page, one
page after another, so a cold build uses one core. Before Sphinx reads anything
(``env-before-read-docs``), this extension finds the pages about to be read that are notebooks
whose cells are not in the execution cache, and executes them in a pool of kernels (as many as
the machine has cores, or ``$ELBO_TERMS_JOBS``), longest first by the last build's timings
(by source size in a clean clone). Each notebook is read with myst-nb's own reader, with its
page-level settings, and executed exactly as myst-nb does (same notebook, same working directory,
same timeout), and its outputs are stored in the same jupyter-cache, so
when Sphinx then reads the page, myst-nb finds it cached. Nothing else changes: the cache key,
the pages, the glue data and the ledger are those of a serial build.

A notebook that fails here is not cached; myst-nb then executes it again while its page is read
and reports the error with its traceback exactly as in a serial build, failing the build. (So do
pages that myst-nb executes its own way: ``execution_in_temp``, excluded or non-cache modes.)

The kernels talk to the build over IPC (local sockets in Jupyter's runtime folder) instead of TCP:
they are on this machine anyway, and a TCP kernel logs a warning per notebook.
"""

from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path, PurePosixPath

from sphinx.util import logging

logger = logging.getLogger(__name__)

# docnames executed by this build, and their execution times (read by elbo_terms.build.buildlog)
EXECUTED: dict[str, float] = {}
FAILED: set[str] = set()


def _ipc_kernel_manager():
    """A kernel manager whose kernels use IPC sockets with absolute, unique paths."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets import default

    class IpcKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self):
            return "ipc"

        @default("ip")
        def _ip_default(self):
            folder = Path(jupyter_runtime_dir())
            folder.mkdir(parents=True, exist_ok=True)
            return str(folder / f"elbo-{uuid.uuid4().hex[:12]}")

    return IpcKernelManager


def jobs() -> int:
    """How many notebooks execute at once: ``$ELBO_TERMS_JOBS``, else the cores this process may use."""
    env = os.environ.get("ELBO_TERMS_JOBS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _times_file(cache_path: str) -> Path:
    # in the build folder, beside .jupyter_cache/ (whose code-hash folders conf.py prunes)
    return Path(cache_path).parent.parent / "notebook-times.json"


def _to_execute(app, env, docnames):
    """(docname, path, notebook, read_fmt, config) of each notebook to read whose cells are not cached."""
    from jupyter_cache import get_cache
    from myst_nb.core.nb_to_tokens import nb_node_to_dict
    from myst_nb.core.read import create_nb_reader

    nb_config = env.mystnb_config
    cache = get_cache(nb_config.execution_cache_path or ".jupyter_cache")
    todo = []
    for docname in docnames:
        path = Path(env.doc2path(docname))
        if path.suffix not in (".md", ".ipynb"):
            continue
        content = path.read_text(encoding="utf8")
        reader = create_nb_reader(str(path), env.myst_config, nb_config, content)
        if reader is None:
            continue
        notebook = reader.read(content)
        config = nb_config
        if nb_config.metadata_key in notebook.metadata:  # page-level settings, applied as myst-nb applies them
            overrides = nb_node_to_dict(notebook.metadata[nb_config.metadata_key])
            overrides.pop("output_folder", None)
            try:
                config = nb_config.copy(**overrides)
            except Exception:  # myst-nb warns about it when it reads the page, and executes it itself
                continue
        if config.execution_mode != "cache" or config.execution_in_temp:
            continue  # myst-nb's own ways
        if any(PurePosixPath(path.as_posix()).match(p) for p in config.execution_excludepatterns):
            continue
        try:
            cache.match_cache_notebook(notebook)
            continue  # cached
        except KeyError:
            pass
        todo.append((docname, path, notebook, reader.read_fmt, config))
    return cache, todo


def execute_ahead(app, env, docnames):
    """``env-before-read-docs``: execute the uncached notebooks among ``docnames``, in parallel."""
    nb_config = env.mystnb_config
    if nb_config.execution_mode != "cache" or app.builder.format != "html":
        return
    from jupyter_cache.base import CacheBundleIn
    from jupyter_cache.executors.utils import single_nb_execution

    cache, todo = _to_execute(app, env, docnames)
    if not todo:
        return
    times_path = _times_file(cache.path)
    try:
        last = json.loads(times_path.read_text(encoding="utf8"))
    except (OSError, ValueError):
        last = {}
    # longest first, so that the pool ends together: by the last build's times; notebooks without
    # one (a clean clone) first, the longest source first
    todo.sort(key=lambda t: (-last.get(t[0], float("inf")), -t[1].stat().st_size, t[0]))
    n = min(jobs(), len(todo))
    if n > 1:  # one core a notebook: torch's own threads would only fight the other kernels for it
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    logger.info(f"executing {len(todo)} notebook(s), {n} at a time: {', '.join(t[0] for t in todo)}")
    manager = _ipc_kernel_manager()
    stages = {docname: cache.add_nb_to_project(str(path), read_data=fmt) for docname, path, _, fmt, _ in todo}

    def run(item):
        docname, path, notebook, _, config = item
        result = single_nb_execution(
            notebook,
            cwd=str(path.parent),
            allow_errors=config.execution_allow_errors,
            timeout=config.execution_timeout,
            meta_override=True,
            kernel_manager_class=manager,
        )
        return item, result

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(run, item) for item in todo]
        for future in as_completed(futures):
            (docname, path, notebook, _, _), result = future.result()
            if result.err is not None:
                FAILED.add(docname)
                logger.info(
                    f"Executing notebook failed after {result.time:.2f} seconds "
                    f"({result.err.__class__.__name__}); executed again while the page is read, to report it",
                    location=docname,
                )
                continue
            cache.cache_notebook_bundle(
                CacheBundleIn(notebook, stages[docname].uri, data={"execution_seconds": result.time}),
                check_validity=False,
                overwrite=True,
            )
            EXECUTED[docname] = result.time
            last[docname] = round(result.time, 2)
            logger.info(f"Executed notebook in {result.time:.2f} seconds", location=docname)
    times_path.parent.mkdir(parents=True, exist_ok=True)
    times_path.write_text(json.dumps(last, indent=1, sort_keys=True) + "\n", encoding="utf8")


def setup(app):
    app.connect("env-before-read-docs", execute_ahead)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
