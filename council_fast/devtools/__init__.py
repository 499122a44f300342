"""Developer tools: GPU compile checks that run without a GPU (``python -m council_fast.devtools.triton_check``,
``python -m council_fast.devtools.compile_check``)."""
