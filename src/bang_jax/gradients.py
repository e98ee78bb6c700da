"""The linen API under its historical name: everything here is :mod:`bang_jax.linen` (see there).

Kept so that ``from bang_jax.gradients import bang_grad`` and the other names of earlier releases keep working.
"""

from bang_jax.linen import *  # noqa: F403  (re-exports exactly linen's public names)
from bang_jax.linen import __all__  # noqa: F401
