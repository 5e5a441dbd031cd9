"""Uploads a file to a Chorus server the way a browser or a bot would: a multipart form
sent by `requests`, an HTTP client written elsewhere. Prints one JSON line:
{"status": <int>, "body": <the answer's JSON, or null>}.

Usage: files_client.py BASE_URL TOKEN WORKSPACE_ID NAME CONTENT_TYPE PATH
An empty CONTENT_TYPE sends the file part without one.
"""

import json
import sys

import requests


def main():
    base, token, workspace, name, content_type, path = sys.argv[1:7]
    with open(path, "rb") as f:
        part = (name, f, content_type) if content_type else (name, f)
        try:
            r = requests.post(
                base + "/api/v1/files/upload",
                headers={"Authorization": "Bearer " + token},
                data={"workspace_id": workspace},
                files={"file": part},
                timeout=300,
            )
        except requests.exceptions.ConnectionError as e:
            print(json.dumps({"status": 0, "body": None, "error": str(e)}))
            return
    try:
        body = r.json()
    except ValueError:
        body = None
    print(json.dumps({"status": r.status_code, "body": body}))


if __name__ == "__main__":
    main()
