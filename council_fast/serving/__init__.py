"""`council-fast serve`: translations over HTTP with dynamic batching, a browser page and face crop.

Modules: ``engine`` (the one adapter onto the conversion library), ``batcher`` (bounded queue and
batching worker), ``app`` (the Starlette app), ``metrics`` (Prometheus text), ``loadtest``
(``council-fast bench serve``), ``page/`` (the static page).
Importing this package imports none of the optional extras (starlette, uvicorn, OpenCV); ``app``
and ``loadtest`` need the serve extra; face crop (``council_fast.facecrop``, shared with convert) needs
the face extra when it runs.
"""
