"""Protocols shared by node and coordinator, one slice per protocol: pure functions and records, no runtime.

Import a protocol by its slice (``from fedcollab.protocols.ddg import ddg_generator``,
``from fedcollab.protocols import secagg``); this package exports no names of its own.

* ``statistics``: the federated statistics round for global feature scaling (exact or DP)
* ``evaluation``: score histograms at the node, pooled accuracy and AUC at the coordinator
* ``dpsgd``: the DP-SGD plan (sample rate, steps, noise multiplier) a node derives from the spec
* ``summary``: the published ``summary.json`` format
* ``secagg``: SecAgg+ secure aggregation as pure stage functions
* ``quantize``: fixed-point encoding modulo 2^32 / 2^64 for secure aggregation, weights packed in
* ``ddg``: the distributed discrete Gaussian (noise shares under secure aggregation), zCDP, wrap-around
* ``partner_dp``: partner-level DP plans (distributed DDG under secagg, central Gaussian), from the spec alone
* ``he``: fixed-point encodings for server-blind aggregation and statistics under HE
* ``query`` and ``profile``: cross-silo analytics (counts, sums, histograms; the dataset profile)
* ``scoring``: encrypted scoring of a linear model (signed request, authenticated and budgeted answer, decryption)
* ``model_file``: the final model file (``model.safetensors``) and its metadata
* ``wire``: message kinds and record keys
* ``gbdt``: federated histogram gradient-boosted trees, DP plan, XGBoost export (a subpackage)
* ``psi``: ECDH private set intersection on ristretto255 for vertical record alignment (a subpackage, needs rbcl)
* ``vertical``: vertical SecureBoost and vertical logistic regression between a label holder and passive parties
"""

__all__: list[str] = []
