"""The book's checking machinery: the identity registry (``identity``), what chapters call
while they execute (``book``), and the Sphinx extensions (``sphinx_ext``: the ledger;
``slides_kit``: LaTeX blocks and citations)."""
