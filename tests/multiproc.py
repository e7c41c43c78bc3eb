# Temporary alias while test_reliability.py moves to syncnorm.testing.
from syncnorm.testing import RankFailure, run_ranks  # noqa: F401
