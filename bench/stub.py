"""Minimal upstream for benchmarks, speaking OpenAI's chat completions and
Anthropic's messages (`POST /v1/messages`): a raw asyncio protocol on
uvloop, keep-alive, canned answers, so it costs as little CPU as possible.
With a delay, every answer is written that many milliseconds after its
request arrived (a slow model's latency at no CPU cost).

    python -m bench.stub PORT [DELAY_MS]
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop

COMPLETION = (b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-bench",'
              b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello world","refusal":null},'
              b'"logprobs":null,"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}')
JSON_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(COMPLETION)).encode() + b"\r\n\r\n" + COMPLETION)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _event(delta: bytes, finish: bytes = b"null") -> bytes:
    return (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
            b'"model":"gpt-bench","choices":[{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":'
            + finish + b"}]}\n\n")


ANTHROPIC = (b'{"id":"msg_bench","type":"message","role":"assistant","model":"claude-bench",'
             b'"content":[{"type":"text","text":"Hello world"}],"stop_reason":"end_turn","stop_sequence":null,'
             b'"usage":{"input_tokens":9,"output_tokens":2}}')
ANTHROPIC_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(ANTHROPIC)).encode() + b"\r\n\r\n" + ANTHROPIC)
ANTHROPIC_EVENTS = [
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_bench","type":"message",'
    b'"role":"assistant","model":"claude-bench","content":[],"stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":9,"output_tokens":1}}}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hello"}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":" world"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
    b'"stop_sequence":null},"usage":{"output_tokens":2}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
SSE_EVENTS = [
    _event(b'{"role":"assistant","content":""}'),
    _event(b'{"content":"Hello"}'),
    _event(b'{"content":" world"}'),
    _event(b"{}", b'"stop"'),
    b"data: [DONE]\n\n",
]


class StubProtocol(asyncio.Protocol):
    delay = 0.0  # seconds before each answer is written
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4:total]
            self.buf = self.buf[total:]
            anthropic = head.startswith(b"post /v1/messages")
            stream = b'"stream":true' in body or b'"stream": true' in body
            if self.delay:
                asyncio.get_running_loop().call_later(self.delay, self.answer, anthropic, stream)
            else:
                self.answer(anthropic, stream)

    def answer(self, anthropic: bool, stream: bool) -> None:
        if self.transport.is_closing():
            return
        if stream:
            events = ANTHROPIC_EVENTS if anthropic else SSE_EVENTS
            self.transport.write(SSE_HEAD + _chunk(events[0]))
            for event in events[1:]:
                self.transport.write(_chunk(event))
            self.transport.write(b"0\r\n\r\n")
        else:
            self.transport.write(ANTHROPIC_RESPONSE if anthropic else JSON_RESPONSE)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StubProtocol, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    StubProtocol.delay = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
    uvloop.run(main(int(sys.argv[1])))
