"""Function discovery: lists each AWS account's Lambda functions, versions and aliases for Upstream status.

Planned work (its own issue); nothing here runs yet.
"""
