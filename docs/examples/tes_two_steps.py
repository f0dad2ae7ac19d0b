"""A two-executor GA4GH TES task on an Asman queue, with the py-tes client.

    pip install py-tes
    python docs/examples/tes_two_steps.py http://127.0.0.1:8080/q/QUEUE

The first executor writes into a volume the two share; the second reads it and its stdout
goes to a file under /outputs, which Asman keeps with the job's result.
(tests/gateway/test_tes.py runs this very file.)
"""

from __future__ import annotations

import sys

import tes


def run(url: str, image: str = "alpine:3.20") -> tes.Task:
    client = tes.HTTPClient(url)  # py-tes adds /ga4gh/tes/v1
    task = tes.Task(
        name="hello-tes",
        tags={"example": "docs"},
        volumes=["/work"],
        inputs=[tes.Input(path="/inputs/name.txt", content="Asman\n")],
        executors=[
            tes.Executor(image=image, command=["sh", "-c", "echo hello > /work/greeting"]),
            tes.Executor(
                image=image,
                command=["sh", "-c", "cat /work/greeting /inputs/name.txt"],
                stdout="/outputs/hello.txt",
            ),
        ],
    )
    task_id = client.create_task(task)
    client.wait(task_id, timeout=300)
    return client.get_task(task_id, view="FULL")


if __name__ == "__main__":
    done = run(sys.argv[1])
    print(done.state, [e.exit_code for e in done.logs[0].logs], done.logs[0].logs[1].stdout)
