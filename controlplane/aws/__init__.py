"""AWS pieces of the request path: the API Gateway event, SigV4 signing, credentials and Lambda's answers."""
