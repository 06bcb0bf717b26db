#!/usr/bin/env bash
# Every part by hand: a PKI, the broker, two operators admitting KOR and USA, a USA node
# receiving, a summary from KOR. Run from anywhere; it works in a scratch directory and
# stops everything it started when it ends. CI runs it (tests/test_walkthrough.py).
set -euo pipefail
BIN="${BIN:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin}"  # the commands `make venv` installs
WORK="$(mktemp -d)"
cd "$WORK"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait
  cd / && rm -rf "$WORK"
}
trap cleanup EXIT

# 1. A development PKI: a CA, the broker, partners KOR USA GBR UKR NATO, operators op1 op2.
"$BIN/coalition-keys" dev-pki pki

# 2. The broker, in the background (it stays in the foreground until SIGTERM otherwise).
#    Port 0 picks a free port; the broker writes the one it bound to broker.port.
"$BIN/coalition-broker" serve --pki pki --data data/broker --operators op1,op2 \
    --listen 127.0.0.1:0 --port-file broker.port 2>broker.log &
PIDS+=($!)
for _ in $(seq 100); do [ -s broker.port ] && break; sleep 0.1; done
export COALITION_BROKER="127.0.0.1:$(cat broker.port)"
echo "broker serving on $COALITION_BROKER"

# 3. Admit KOR and USA: op1 proposes, op2 approves (the two-person rule).
for P in KOR USA; do
  PROPOSAL=$("$BIN/coalition-admin" --identity pki/operators/op1 --json partners admit "$P" \
      --signing-cert "pki/partners/$P/signing.crt" --clearance NATO=SECRET \
      --ceiling NATO=SECRET --group NATO --publish 'intel.>' --subscribe 'intel.>' \
      --reason "$P joins" |
    "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["proposal"]["proposal_id"])')
  "$BIN/coalition-admin" --identity pki/operators/op2 policy approve "$PROPOSAL" --reason agreed
done

# 4. A node config per partner (every key: docs/node.md), and a report to send.
for P in KOR USA; do
  cat >"node-$P.toml" <<TOML
broker   = "$COALITION_BROKER"
identity = "pki/partners/$P"
inbox    = "data/$P/node.db"
topics   = ["intel.>"]
TOML
done
printf 'Armour moving north of the river\nThree companies with fuel trucks.\n' >report.txt

# 5. The USA node daemon, in the background (it runs until SIGTERM); wait until connected.
"$BIN/coalition-node" run --config node-USA.toml 2>usa.log &
PIDS+=($!)
until "$BIN/coalition-node" status --config node-USA.toml --json |
    "$BIN/python" -c 'import json, sys; sys.exit(json.load(sys.stdin)["last_connected_ms"] is None)'
do sleep 0.2; done

# 6. KOR publishes (this command returns once the broker has stored the summary).
"$BIN/coalition-node" publish --config node-KOR.toml --topic intel.ground \
    --label "NATO SECRET // REL TO NATO, KOR" --precedence FLASH report.txt

# 7. USA's inbox, once the summary has arrived.
until [ "$("$BIN/coalition-node" inbox --config node-USA.toml --json |
    "$BIN/python" -c 'import json, sys; print(len(json.load(sys.stdin)))')" -ge 1 ]
do sleep 0.2; done
"$BIN/coalition-node" inbox --config node-USA.toml
