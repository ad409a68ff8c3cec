#!/usr/bin/env bash
# IP cameras' CPU cost (issue 23): nanodetd's H.264 decoding (OpenH264,
# built from the openh264 crate's bundled source) per 1080p frame, beside
# ffmpeg's decoder (libavcodec, one thread) on the same clips, in one run.
# Needs ffmpeg, which also makes the clips (benches/h264.rs).
#
# Usage: benches/h264.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench h264 -- --noplot 2>&1 | grep -E "^h264|^nv12|time:|thrpt:"
for profile in baseline high; do
    clip=target/bench-h264/1080p-$profile.h264
    frames=$(ffprobe -v error -count_frames -select_streams v:0 \
        -show_entries stream=nb_read_frames -of csv=p=0 "$clip")
    best=""
    for _ in 1 2 3 4 5; do
        utime=$(ffmpeg -hide_banner -nostdin -threads 1 -benchmark -i "$clip" -f null - 2>&1 |
            sed -n 's/.*utime=\([0-9.]*\)s.*/\1/p')
        best=$(python3 -c "print(min(float(x) for x in '$best $utime'.split()))")
    done
    python3 -c "print(f'ffmpeg (libavcodec, 1 thread) $profile: {1000 * $best / $frames:.2f} ms per frame, best of 5 ($frames frames, CPU time)')"
done
