"""MEDS reward-shaping service: an error memory that penalises recurring mistakes in RL of LLMs."""

import os

# The refit pool's forkserver (and the tests' zygote) imports scikit-learn and then forks. scikit-learn brings
# pandas and, where it is installed, pyarrow, whose jemalloc starts a background thread; a fork while that
# thread holds one of its locks leaves the child hung before its first line of output (seen once in a test's
# crash loop). Without the thread jemalloc works as well; set before anything here can load pyarrow.
os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")

__version__ = "0.1.0"
