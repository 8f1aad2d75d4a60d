"""Task data: GLUE and custom task specs (``tasks``), loading, tokenising and batching
(``loading``), and the task metrics (``metrics``). Nothing here knows about students or NNI."""
