"""Pieces every pass family shares; a family imports only from here and from the core.

``graphs``: protobuf helpers for passes (scopes, type maps, opset lookup, renaming);
``layers``: weight layers and their canonical matrix view; ``stats``: streaming
statistics of the layers' input activations over calibration data; ``budget``: the
lossy passes' error budget, the held-out judge and the one back-off search; ``estimate``:
the cross-fitted check (plans fitted per fold) the lossy passes decide on;
``linalg``: the linear algebra the families share (scipy.linalg factorizations).
"""
