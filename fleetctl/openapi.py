"""The OpenAPI 3.1 document of `warmfleet api` (fleetctl/api.py); the request schema is the request model's own."""

from __future__ import annotations

from typing import Any

from tasks.requests import GenerateRequest


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def document() -> dict[str, Any]:
    request = GenerateRequest.model_json_schema()
    generation = {
        "type": "object", "required": ["id", "status"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": ["queued", "running", "retrying", "succeeded", "failed", "cancelled"]},
            "result": {"type": "object", "description": "release, worker, seed, width, height, steps, guidance, "
                       "timings, … (the result of generate, without the store's URI)"},
            "image_url": {"type": "string", "description": "signed; works until image_url_expires"},
            "image_url_expires": {"type": "integer", "description": "Unix time"},
            "error": {"type": "string", "description": "one line, when failed"},
        },
    }
    auth = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "warmfleet", "version": "1", "description": "Text-to-image jobs on the warmfleet GPU fleet."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "an API key "
                                           "(`warmfleet api-key add <client>`)"}},
            "schemas": {"GenerateRequest": request, "Generation": generation,
                        "Accepted": {"type": "object", "properties": {"id": {"type": "string"}, "status": {
                            "type": "string"}, "url": {"type": "string"}}},
                        "Error": {"type": "object", "properties": {"error": {"type": "string"}}}},
        },
        "paths": {
            "/v1/generations": {"post": {
                "summary": "Queue a generation", "security": auth,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/GenerateRequest"}}}},
                "responses": {
                    "202": {"description": "queued", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Accepted"}}}},
                    "401": _error("missing or wrong API key"), "422": _error("bad parameters (one line)"),
                    "429": _error("over the key's rate limit or queued-jobs cap"),
                }}},
            "/v1/generations/{id}": {"get": {
                "summary": "A generation's status and result", "security": auth,
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "wait", "in": "query", "schema": {"type": "number", "maximum": 30},
                     "description": "seconds to wait for it to finish"}],
                "responses": {
                    "200": {"description": "its state", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Generation"}}}},
                    "401": _error("missing or wrong API key"), "404": _error("no such generation for this key"),
                    "429": _error("over the key's rate limit"),
                }}},
            "/v1/images/{id}.png": {"get": {
                "summary": "The image, by the signed URL a finished generation gives",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "expires", "in": "query", "required": True, "schema": {"type": "integer"}},
                    {"name": "sig", "in": "query", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "PNG", "content": {"image/png": {}}},
                              "403": _error("expired or wrongly signed URL"), "404": _error("no image")},
            }},
        },
    }


OPENAPI = document()
