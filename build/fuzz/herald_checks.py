"""Herald's own schemathesis check, loaded with SCHEMATHESIS_HOOKS=herald_checks (build/fuzz.sh).

Every error response of both APIs must carry the one error body of SPEC §4:
{"status": <the HTTP status>, "internalCode": <6 digits, first three = the status>, "message": "..."}.

`no_write_succeeds` is for the run with a read-only key (messages:read and metrics): no
operation that changes something may answer 2xx, and each is refused with 403001.
"""

import schemathesis


@schemathesis.check
def herald_error_body(ctx, response, case):
    """An error answers with exactly {status, internalCode, message}, consistent with its status."""
    status = response.status_code
    if status < 400:
        return
    try:
        body = response.json()
    except Exception as error:  # noqa: BLE001 - any unreadable body is the finding
        raise AssertionError(f"{status} without a JSON error body: {error}") from None
    if not isinstance(body, dict) or set(body) != {"status", "internalCode", "message"}:
        raise AssertionError(f"{status} error body is not {{status, internalCode, message}}: {body!r}")
    if body["status"] != status:
        raise AssertionError(f"error body says status {body['status']} on a {status} response")
    code = body["internalCode"]
    if not isinstance(code, int) or not 100000 <= code <= 599999 or code // 1000 != status:
        raise AssertionError(f"internalCode {code!r} does not belong to status {status}")
    if not isinstance(body["message"], str) or not body["message"].strip():
        raise AssertionError(f"{status} error body has no message")


WRITES = {"POST", "PUT", "PATCH", "DELETE"}


@schemathesis.check
def no_write_succeeds(ctx, response, case):
    """With a read-only key, every write is refused with 403001 once the key is checked."""
    if case.method.upper() not in WRITES:
        return
    if response.status_code < 400:
        raise AssertionError(f"{case.method} {case.path} succeeded ({response.status_code}) with a read-only key")
    if response.status_code == 403:
        code = response.json().get("internalCode")
        if code != 403001:
            raise AssertionError(f"403 with internalCode {code!r}, not 403001")
