"""Run a collaboration on Flower's simulation engine: ``fedcollab.run(spec) -> Result``."""

from fedcollab.runner._flower_app import flower_client_app, flower_server_app
from fedcollab.runner._predict import FedcollabModel, load_model
from fedcollab.runner._run import Result, run, run_demo

__all__ = ["FedcollabModel", "Result", "flower_client_app", "flower_server_app", "load_model", "run", "run_demo"]
