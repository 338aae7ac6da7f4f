"""Node-local data: reading a silo's source, schema validation, encoding, splits, statistics.

Runs at the partner only: the coordinator never imports this package (import-linter contract).
"""

from fedcollab.data._encode import FeatureEncoder, feature_bounds
from fedcollab.data._prepare import PartnerData, load_partner_data, prepare_frame
from fedcollab.data._source import EMBEDDED_PREFIX, embedded_path, read_source, resolve_path
from fedcollab.data._split import split_indices
from fedcollab.data._stats import exact_statistics
from fedcollab.data._validate import validate_frame
from fedcollab.data._vertical import VerticalPartyData, encoded_names, load_vertical_party, party_features, prepare_vertical_frame

__all__ = [
    "EMBEDDED_PREFIX",
    "FeatureEncoder",
    "PartnerData",
    "VerticalPartyData",
    "embedded_path",
    "encoded_names",
    "exact_statistics",
    "feature_bounds",
    "load_partner_data",
    "load_vertical_party",
    "party_features",
    "prepare_frame",
    "prepare_vertical_frame",
    "read_source",
    "resolve_path",
    "split_indices",
    "validate_frame",
]
