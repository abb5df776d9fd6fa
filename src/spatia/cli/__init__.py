"""The `spatia` command: one Typer app, one module per pipeline stage.

Commands are registered in pipeline order (simulate, info, build, dataset-info, pretrain,
embed, evaluate, pair, flow, demo); each parses options into the stage's typed config, calls
the stage function in `spatia.stages`, and prints the result's summary.
"""

from spatia.cli import io, mist, train, evaluate, perturb  # noqa: F401  (registration order = pipeline order)
from spatia.cli._app import USER_ERROR_EXIT_CODE, app
from spatia.cli.flow import flow_app

app.add_typer(flow_app, name="flow", help="Morphology generation: train, generate, evaluate, ablate.")

from spatia.cli import demo  # noqa: F401,E402  (last: `spatia demo` runs every stage above)

__all__ = ["USER_ERROR_EXIT_CODE", "app"]
