"""Pure functions from the model to Envoy resources and the route table that ext_proc uses. No I/O."""
