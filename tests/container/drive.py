"""Drives one batch through a batchd server with the official openai SDK (the container test).

    python drive.py BASE_URL API_KEY LINES [LATENCY_MS]   # prints the batch id, waits for completion
    python drive.py BASE_URL API_KEY --submit-only LINES LATENCY_MS   # prints the batch id, returns
    python drive.py BASE_URL API_KEY --wait BATCH_ID LINES           # waits for it, checks its results
"""
import io
import json
import sys
import time

from openai import OpenAI


def lines(n, latency_ms):
    for i in range(n):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hello from req-{i}"}]}
        if latency_ms:
            body["mock"] = {"latency_ms": latency_ms}
        yield json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})


def submit(client, n, latency_ms):
    data = ("\n".join(lines(n, latency_ms)) + "\n").encode()
    f = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    return b.id


def wait(client, batch_id, n, timeout=120):
    deadline = time.time() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            break
        assert time.time() < deadline, f"batch {batch_id} still {b.status} after {timeout} s"
        time.sleep(0.3)
    assert b.status == "completed", b
    assert b.request_counts.completed == n and b.request_counts.failed == 0, b.request_counts
    out = [json.loads(l) for l in client.files.content(b.output_file_id).text.splitlines() if l.strip()]
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(n)), "each line answered once"
    for o in out:
        assert o["response"]["status_code"] == 200, o
        text = o["response"]["body"]["choices"][0]["message"]["content"]
        assert text == f"echo: hello from {o['custom_id']}", (text, o["custom_id"])
    print(f"batch {batch_id}: {n} lines completed, each answered once with its own text")


def main():
    base, key, *rest = sys.argv[1:]
    client = OpenAI(base_url=base, api_key=key, max_retries=5)
    if rest[0] == "--submit-only":
        print(submit(client, int(rest[1]), int(rest[2])))
    elif rest[0] == "--wait":
        wait(client, rest[1], int(rest[2]))
    else:
        n = int(rest[0])
        wait(client, submit(client, n, int(rest[1]) if len(rest) > 1 else 0), n)


if __name__ == "__main__":
    main()
