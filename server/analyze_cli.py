"""`cacheblend analyze FILE --question Q`: a client of a running server.

It registers the file's text as a document (progress on stderr), asks the question over
windows of its pieces, prints each window's answer and the final one, and deletes the document
unless `--keep`. Interrupting it during registration cancels the registration on the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import httpx


class ServerError(Exception):
    pass


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="ask one question over a long text file, window by window (client)")
    p.add_argument("file", type=Path, help="a UTF-8 text file")
    p.add_argument("--question", required=True)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    p.add_argument("--window", type=int, default=4, help="pieces per window")
    p.add_argument("--stride", type=int, default=None, help="pieces between window starts (default: --window)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per answer")
    p.add_argument("--reduce", action="store_true", help="also answer from the window answers together")
    p.add_argument("--keep", action="store_true", help="keep the document registered (its ID goes to stderr)")
    p.set_defaults(func=run)


def _error(response: httpx.Response) -> ServerError:
    try:
        return ServerError(f"{response.status_code}: {response.json()['error']['message']}")
    except (ValueError, KeyError, TypeError):
        return ServerError(f"{response.status_code}: {response.text[:200]}")


def _check(response: httpx.Response) -> dict:
    if response.status_code != 200:
        raise _error(response)
    return response.json()


def register_document(client: httpx.Client, text: str) -> dict:
    """POST /v1/documents with progress events; the document object."""
    with client.stream("POST", "/v1/documents", json={"text": text, "stream": True}) as response:
        if response.status_code != 200:
            response.read()
            raise _error(response)
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise ServerError(event["error"]["message"])
            if event.get("object") == "document.progress":
                print(f"\rprecomputing pieces: {event['pieces_done']}/{event['pieces_total']}", end="", file=sys.stderr)
            elif event.get("object") == "document":
                print(file=sys.stderr)
                return event
    raise ServerError("the registration ended without a document")


def run(args: argparse.Namespace) -> int:
    text = args.file.read_text(encoding="utf-8")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = {"question": args.question, "window": args.window, "stride": args.stride, "max_tokens": args.max_tokens,
            "reduce": args.reduce}
    doc: Optional[dict] = None
    # No read timeout: precomputing a long document's pieces takes minutes on a CPU.
    with httpx.Client(base_url=args.url, headers=headers, timeout=httpx.Timeout(30.0, read=None)) as client:
        try:
            doc = register_document(client, text)
            print(f"{doc['id']}: {doc['tokens']} tokens in {len(doc['chunks'])} pieces", file=sys.stderr)
            analysis = _check(client.post(f"/v1/documents/{doc['id']}/analyze", json=body))
            for w in analysis["windows"]:
                print(f"[pieces {w['first_chunk']}-{w['last_chunk']}] {w['answer'].strip()}")
            if analysis["answer"] is not None:
                print(f"[final] {analysis['answer'].strip()}")
        except (ServerError, httpx.HTTPError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            if doc is not None:
                _finish(client, doc["id"], args.keep)
    return 0


def _finish(client: httpx.Client, doc_id: str, keep: bool) -> None:
    if keep:
        print(f"kept document {doc_id}", file=sys.stderr)
        return
    try:
        client.delete(f"/v1/documents/{doc_id}")
    except httpx.HTTPError as e:
        print(f"could not delete document {doc_id}: {e}", file=sys.stderr)
