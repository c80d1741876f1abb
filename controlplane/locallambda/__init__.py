"""A local stand-in for the AWS Lambda Invoke API, for running lambdagate without an AWS account.

Serves Python handlers kept in a folder on loopback and checks SigV4 signatures like AWS does.
"""

from .server import LocalLambda
from .sigv4 import SigV4Error, SigV4Verifier

__all__ = ["LocalLambda", "SigV4Error", "SigV4Verifier"]
