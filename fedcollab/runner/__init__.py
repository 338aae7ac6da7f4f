"""Run a collaboration on Flower's simulation engine: ``fedcollab.run(spec) -> Result``."""

from fedcollab.runner._run import Result, run, run_demo

__all__ = ["Result", "run", "run_demo"]
