#!/usr/bin/env bash
# Tiny nni-effbert search on NNI's `remote` training service, against a real OpenSSH server
# started on loopback for this run only (key auth, high port, its own sshd_config; the
# system's sshd is not touched). Needs root (apt-get, sshd) -- hence a bench script, not a test.
#
#   bash bench/remote_ssh/run.sh [ROOT]        # ROOT: scratch folder (default: a new /tmp dir)
#
# Evidence (trial ids, statuses, metrics from the REST API) is printed and written to
# ROOT/evidence.json. Exit status 0 only if every trial SUCCEEDED and the metrics reached the
# advisor.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
ROOT="${1:-$(mktemp -d /tmp/effbert-remote.XXXXXX)}"
ROOT="$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)"
PY="${PYTHON:-$(command -v python3)}"
PY="$("$PY" -c 'import sys; print(sys.executable)')"
SSHD=/usr/sbin/sshd

if [ ! -x "$SSHD" ]; then
  echo "installing Debian's openssh-server" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null
fi

KEYS="$ROOT/ssh"
mkdir -p "$KEYS" /run/sshd   # /run/sshd: sshd's privilege-separation directory
chmod 700 "$KEYS"
ssh-keygen -q -t ed25519 -N '' -f "$KEYS/client_key" <<<y >/dev/null
ssh-keygen -q -t ed25519 -N '' -f "$KEYS/host_key" <<<y >/dev/null
cp "$KEYS/client_key.pub" "$KEYS/authorized_keys"
chmod 600 "$KEYS/authorized_keys" "$KEYS/client_key" "$KEYS/host_key"
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

cat > "$KEYS/sshd_config" <<CONF
Port $PORT
ListenAddress 127.0.0.1
HostKey $KEYS/host_key
AuthorizedKeysFile $KEYS/authorized_keys
PidFile $KEYS/sshd.pid
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
CONF

"$SSHD" -t -f "$KEYS/sshd_config"
"$SSHD" -f "$KEYS/sshd_config" -E "$KEYS/sshd.log"
cleanup() { [ -f "$KEYS/sshd.pid" ] && kill "$(cat "$KEYS/sshd.pid")" 2>/dev/null || true; }
trap cleanup EXIT

# The server answers with key auth (and refuses passwords) before NNI is pointed at it.
ssh -i "$KEYS/client_key" -p "$PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o BatchMode=yes -o PasswordAuthentication=no root@127.0.0.1 true
echo "sshd on 127.0.0.1:$PORT (key auth only), root $ROOT" >&2

"$PY" "$REPO/bench/remote_ssh/remote_search.py" --root "$ROOT" --port "$PORT" --key "$KEYS/client_key"
