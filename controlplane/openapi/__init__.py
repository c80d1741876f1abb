"""`lambdagate import-openapi` and `export-openapi`: OpenAPI 3.x / Swagger 2.0 documents to an Upstream and a
VirtualService, and a VirtualService back to an OpenAPI 3.0 document in API Gateway's dialect."""

from controlplane.openapi.exporter import ExportError, ExportOptions, export
from controlplane.openapi.importer import ImportOptions, ImportResult, OpenApiError, import_openapi, load_spec

__all__ = [
    "ExportError",
    "ExportOptions",
    "ImportOptions",
    "ImportResult",
    "OpenApiError",
    "export",
    "import_openapi",
    "load_spec",
]
