#!/usr/bin/python3
"""An RTSP server for the tests: GStreamer's (gst-rtsp-server, Debian's
gir1.2-gst-rtsp-server-1.0 and python3-gst-1.0), serving one H.264 file
(Annex B) in a loop, at the rate its SPS gives, over TCP and UDP, with
basic or digest authentication if asked.

usage: server.py PORT MOUNT FILE.h264|FILE.h265 [--user U --password P [--digest]]

Prints "ready" once it listens; SIGTERM ends it. Run it with Debian's
/usr/bin/python3, which has the gi bindings.
"""
import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


class Looping(GstRtspServer.RTSPMediaFactory):
    """Each client gets its own pipeline, from the file's first key frame:
    a shared one makes a late client wait, then sends it a burst."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.set_shared(False)

    def do_create_element(self, url):
        # A .h265 file is served as H.265, for the test of a codec
        # nanodetd refuses.
        codec = "h265" if self.path.endswith(".h265") else "h264"
        pipeline = Gst.parse_bin_from_description(
            # The parser times the units from the SPS, so they go out in
            # real time; config-interval=-1 sends the parameter sets with
            # each key frame.
            f"multifilesrc name=src loop=true caps=video/x-{codec},stream-format=byte-stream"
            f" ! {codec}parse ! rtp{codec}pay name=pay0 pt=96 config-interval=-1",
            False,
        )
        pipeline.get_by_name("src").set_property("location", self.path.replace("%", "%%"))
        return pipeline


def main():
    args = argparse.ArgumentParser()
    args.add_argument("port", type=int)
    args.add_argument("mount")
    args.add_argument("file")
    args.add_argument("--user")
    args.add_argument("--password", default="")
    args.add_argument("--digest", action="store_true")
    a = args.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(a.port))
    factory = Looping(a.file)
    if a.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "viewer")
        if a.digest:
            auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
            auth.add_digest(a.user, a.password, token)
        else:
            auth.set_supported_methods(GstRtsp.RTSPAuthMethod.BASIC)
            auth.add_basic(GstRtspServer.RTSPAuth.make_basic(a.user, a.password), token)
        server.set_auth(auth)
        factory.add_role_from_structure(
            Gst.Structure.new_from_string(
                "viewer, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"
            )
        )
    server.get_mount_points().add_factory("/" + a.mount.lstrip("/"), factory)
    if server.attach(None) == 0:
        sys.exit("cannot listen on 127.0.0.1:%d" % a.port)
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
