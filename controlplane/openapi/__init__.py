"""`lambdagate import-openapi`: an Upstream and a VirtualService from an OpenAPI 3.x or Swagger 2.0 document."""

from controlplane.openapi.importer import ImportOptions, ImportResult, OpenApiError, import_openapi, load_spec

__all__ = ["ImportOptions", "ImportResult", "OpenApiError", "import_openapi", "load_spec"]
