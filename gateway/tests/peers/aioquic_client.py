"""A Chorus QUIC client written with aioquic, a QUIC stack independent of the server's:
it proves API.md §8's framing from outside. It pins the server certificate by its SHA-256,
authenticates, resumes one channel from a seq, reads the replayed event, sends a message
and reads its ack and its event, pings, and prints one JSON line with what it saw.

Usage: aioquic_client.py HOST PORT PIN TOKEN CHANNEL SINCE
"""
import asyncio
import hashlib
import json
import ssl
import struct
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived
from cryptography.hazmat.primitives.serialization import Encoding


class Session(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffer = b""
        self.frames = asyncio.Queue()
        self.kept = []

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived):
            self.buffer += event.data
            while len(self.buffer) >= 4:
                (length,) = struct.unpack(">I", self.buffer[:4])
                if len(self.buffer) < 4 + length:
                    break
                self.frames.put_nowait(json.loads(self.buffer[4 : 4 + length]))
                self.buffer = self.buffer[4 + length :]
        elif isinstance(event, ConnectionTerminated):
            self.frames.put_nowait({"type": "closed", "code": event.error_code})

    async def next(self, kind):
        """The next frame of a kind. Frames of other kinds are kept for later calls: the
        protocol does not order an ack against the event of the same message."""
        for i, frame in enumerate(self.kept):
            if frame["type"] == kind:
                return self.kept.pop(i)
        while True:
            frame = await asyncio.wait_for(self.frames.get(), 10)
            if frame["type"] == kind:
                return frame
            if frame["type"] == "closed":
                raise RuntimeError(f"closed with {frame['code']} while waiting for {kind}")
            self.kept.append(frame)


async def main(host, port, pin, token, channel, since):
    config = QuicConfiguration(is_client=True, alpn_protocols=["chorus/1"], idle_timeout=20.0)
    # Trust comes from the pin, checked below, not from a certificate authority.
    config.verify_mode = ssl.CERT_NONE
    async with connect(host, port, configuration=config, create_protocol=Session) as session:
        der = session._quic.tls._peer_certificate.public_bytes(Encoding.DER)
        if hashlib.sha256(der).hexdigest() != pin:
            raise RuntimeError("the server certificate does not match the pin")
        stream = session._quic.get_next_available_stream_id()

        def send(frame):
            body = json.dumps(frame).encode()
            session._quic.send_stream_data(stream, struct.pack(">I", len(body)) + body)
            session.transmit()

        send({"type": "auth", "token": token})
        send({"type": "resume", "since": {channel: since}})
        hello = await session.next("hello")
        replayed = await session.next("event")
        await session.next("resumed")
        send({"type": "message:send", "ref": "py-1", "channel_id": channel,
              "text": "hello from aioquic", "client_msg_id": "py-1"})
        ack = await session.next("ack")
        own = await session.next("event")
        send({"type": "ping", "ref": "py-ping"})
        pong = await session.next("pong")
        print(json.dumps({
            "hello_user": hello["user_id"],
            "replayed_seq": replayed["seq"],
            "ack_ref": ack["ref"],
            "ack_text": ack["message"]["text"],
            "own_seq": own["seq"],
            "pong_ref": pong["ref"],
        }))


if __name__ == "__main__":
    host, port, pin, token, channel, since = sys.argv[1:7]
    asyncio.run(main(host, int(port), pin, token, channel, int(since)))
