"""The certified solver: the Gauss-Newton product and K-FAC, the data term and priors, the Krylov λ paths, the
choice of the prior and λ by cross-validation (``selection``) and the certified conjugate-gradient refit."""

from .kfac import KFAC
from .selection import Selection, select
from .solve import Certificate, DataTerm, HeadPath, KrylovPath, PriorMetric, solve

__all__ = ["KFAC", "Certificate", "DataTerm", "HeadPath", "KrylovPath", "PriorMetric", "Selection", "select", "solve"]
