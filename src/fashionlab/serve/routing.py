"""bind(): a router module's plain route function, as an endpoint FastAPI can register; RequestRoute:
a route that hands the request straight to its endpoint (the prediction routes).

Route functions take what they share (the ModelService, the Settings) as leading arguments and
the request's parameters after them, so they stay plain module-level functions. FastAPI builds
a route's parameters, its name (hence the OpenAPI operation id and summary) and its OpenAPI
description from the endpoint's signature, `__name__` and docstring: `bind` gives the endpoint
exactly those of the route function, minus the leading arguments it fills in.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from fastapi.routing import APIRoute


def bind(route: Callable[..., Any], *leading: Any, **defaults: Any) -> Callable[..., Any]:
    """`route` with its first arguments given; `defaults` replace the declared defaults of the named
    parameters (for a parameter whose OpenAPI documentation depends on the settings)."""
    signature = inspect.signature(route, eval_str=True)  # evaluated: a partial has no globals to resolve them in
    params = list(signature.parameters.values())[len(leading):]
    unknown = set(defaults) - {p.name for p in params}
    if unknown:
        raise TypeError(f"{route.__name__} has no parameters {', '.join(sorted(unknown))}")
    endpoint = functools.partial(route, *leading)
    endpoint.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(default=defaults.get(p.name, p.default)) for p in params])
    endpoint.__name__ = route.__name__  # type: ignore[attr-defined]
    endpoint.__doc__ = route.__doc__
    return endpoint


class RequestRoute(APIRoute):
    """A route whose endpoint takes only the Request and returns a Response: FastAPI's per-request
    machinery (solving parameters, encoding the answer) is skipped: that and the frozen start-up objects
    (app.prepared) together took the event loop's CPU per request for a 28x28 PNG from about 670 to 420
    microseconds (in-process, 32 concurrent requests through the app). The OpenAPI
    schema is FastAPI's, from the route's declared `openapi_extra` and `responses`."""

    def get_route_handler(self) -> Callable[..., Any]:
        return self.endpoint
