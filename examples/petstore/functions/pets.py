"""Petstore handlers for the local Lambda endpoint: API Gateway proxy events in, proxy responses out.

The store lives in the endpoint's memory, as a warm Lambda's globals would.
"""

import json

PETS = {
    "1": {"id": "1", "name": "Rex", "tag": "dog"},
    "2": {"id": "2", "name": "Tom", "tag": "cat"},
}


def _reply(status, body):
    return {
        "statusCode": status,
        "headers": {"Content-Type": "application/json"},
        "body": json.dumps(body),
    }


def list_pets(event, context):
    pets = sorted(PETS.values(), key=lambda p: int(p["id"]))
    limit = (event.get("queryStringParameters") or {}).get("limit")
    if limit and limit.isdigit():
        pets = pets[: int(limit)]
    return _reply(200, pets)


def create_pet(event, context):
    try:
        pet = json.loads(event.get("body") or "")
    except ValueError:
        return _reply(400, {"message": "body must be a JSON pet"})
    if not isinstance(pet, dict) or not isinstance(pet.get("name"), str):
        return _reply(400, {"message": "a pet needs a name"})
    pet_id = str(max((int(k) for k in PETS), default=0) + 1)
    PETS[pet_id] = {"id": pet_id, "name": pet["name"], "tag": pet.get("tag")}
    return _reply(201, PETS[pet_id])


def get_pet(event, context):
    pet_id = event["pathParameters"]["petId"]
    pet = PETS.get(pet_id)
    if pet is None:
        return _reply(404, {"message": f"pet {pet_id} not found"})
    return _reply(200, pet)


def delete_pet(event, context):
    pet_id = event["pathParameters"]["petId"]
    if PETS.pop(pet_id, None) is None:
        return _reply(404, {"message": f"pet {pet_id} not found"})
    return {"statusCode": 204, "body": ""}
