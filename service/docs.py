"""Swagger UI at /docs and ReDoc at /redoc, from assets served by this app (no CDN).

The assets come from the `fastapi-offline` package (swagger-ui-dist and redoc bundles), so
the pages work on a machine with no internet access.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.routing import Router

ASSETS_URL = "/docs-assets"

# The pages may load nothing from elsewhere: the ReDoc bundle would fetch its maker's logo
# from a CDN (it hides the image when that fails); the browser is told not to try.
DOCS_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline' blob:",  # the inline start-up script; ReDoc's worker
        "worker-src 'self' blob:",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ]
)


def _no_third_parties(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


_ASSETS_DIR = str(files("fastapi_offline") / "static")


def install_docs(app: FastAPI, *, openapi_url: str = "/openapi.json") -> None:
    """Create the app with `docs_url=None, redoc_url=None`, then call this."""
    app.mount(ASSETS_URL, StaticFiles(directory=_ASSETS_DIR), name="docs-assets")
    title = app.title
    oauth2_redirect_url = "/docs/oauth2-redirect"
    pages = Router()

    @pages.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return _no_third_parties(
            get_swagger_ui_html(
                openapi_url=openapi_url,
                title=f"{title} - Swagger UI",
                oauth2_redirect_url=oauth2_redirect_url,
                swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
                swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
                swagger_ui_parameters={
                    "persistAuthorization": False,
                    "displayRequestDuration": True,
                },
            )
        )

    @pages.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @pages.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return _no_third_parties(
            get_redoc_html(
                openapi_url=openapi_url,
                title=f"{title} - ReDoc",
                redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
                with_google_fonts=False,
            )
        )

    app.include_router(pages)
