"""Model construction from the spec, and conversion to and from flat numpy arrays.

Shared by the node and the coordinator (which needs the initial parameters).
"""

from fedcollab.models._build import build_model, model_arrays, set_model_arrays

__all__ = ["build_model", "model_arrays", "set_model_arrays"]
