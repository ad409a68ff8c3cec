#!/usr/bin/env bash
# The inside half of scripts/fresh-machine.sh: in the fresh root, runs the
# two commands of the README's first code block, exactly as written there.
# The first (the demo) builds, then runs for 20 s once the daemon says it
# is running, and must print an event line for every object in the demo
# photos; the second (the tests) must pass. Refuses to run anywhere but in
# a root that fresh-machine.sh made: it installs packages as it goes.
set -uo pipefail
# Both the root's marker file and the variable fresh-machine.sh sets: the
# test suite, which runs inside that root too, checks the refusal with the
# variable removed.
if [[ ! -f /etc/nanodetd-fresh-root || ${NANODETD_FRESH_ROOT:-} != 1 ]]; then
    echo "fresh-machine-inside.sh: refusing to run: this runs only inside the root scripts/fresh-machine.sh builds (/etc/nanodetd-fresh-root and NANODETD_FRESH_ROOT=1)" >&2
    exit 64
fi
cd "$(dirname "$0")/.."
say() { echo "fresh-machine (inside): $*"; }

mapfile -t commands < <(awk '/^```sh$/ {inside = 1; next} inside && /^```/ {exit}
    inside && NF && $1 !~ /^#/ {print}' README.md)
((${#commands[@]} == 2)) || { say "README's first code block holds ${#commands[@]} commands, not 2"; exit 1; }
say "Rust $(rustc --version), $(cc --version | head -1)"
say "the README's commands: '${commands[0]}' and '${commands[1]}'"

# --- 1. The demo.
start=$(date +%s)
setsid bash -c "${commands[0]}" >/tmp/demo.out 2>/tmp/demo.err &
demo=$!
until grep -q 'running: ' /tmp/demo.err 2>/dev/null; do
    if ! kill -0 "$demo" 2>/dev/null; then
        tail -30 /tmp/demo.err
        say "FAILED: the demo exited before it ran"
        exit 1
    fi
    sleep 1
done
say "the demo built and started in $(($(date +%s) - start)) s; running it 20 s"
sleep 20
kill -INT -- "-$demo"
wait "$demo"
rc=$?
say "the demo exited $rc on SIGINT"
echo "--- events printed by the demo:"
cat /tmp/demo.out
echo "---"
verdict=0
((rc == 0)) || { say "FAILED: exit $rc, not 0"; tail -20 /tmp/demo.err; verdict=1; }
for label in person cat cup "dining table"; do
    grep -q " demo new    $label #" /tmp/demo.out ||
        { say "FAILED: no 'new $label' line printed"; verdict=1; }
done
((verdict == 0)) || exit 1

# --- 2. The tests.
if [[ -n ${FRESH_SKIP_TESTS:-} ]]; then
    say "tests skipped (FRESH_SKIP_TESTS)"
    exit 0
fi
start=$(date +%s)
bash -c "${commands[1]}"
rc=$?
say "the tests exited $rc after $(($(date +%s) - start)) s"
exit $rc
