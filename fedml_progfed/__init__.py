"""fedml-progfed: progressive federated training (ProgFed, ICML 2022) as a FedML plugin.

The FedML pair lives in :mod:`fedml_progfed.fedml_plugin`; the framework-free
algorithm in :mod:`fedml_progfed.core`.
"""

__version__ = "0.1.0"
