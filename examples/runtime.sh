#!/bin/sh
# A Gantry function runtime in POSIX shell, for images that have curl (7.40 or newer, for
# --unix-socket). It echoes every input back with its content type, and answers an input
# `fail:MESSAGE` with an error. One input at a time: concurrency is the number of outstanding
# `next` calls, and this loop keeps one. docs/functions.md describes the contract;
# examples/echo-runtime is the same in Rust, with concurrency.
set -u

api=${GANTRY_RUNTIME_API:-}
if [ -z "$api" ]; then
  echo "runtime.sh: GANTRY_RUNTIME_API is not set; run this in a Gantry function container" >&2
  exit 2
fi
if [ ! -S "$api" ]; then
  echo "runtime.sh: the runtime API socket $api does not exist (GANTRY_RUNTIME_API)" >&2
  exit 2
fi
if ! command -v curl >/dev/null 2>&1; then
  echo "runtime.sh: needs curl in the image" >&2
  exit 2
fi

tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$tmp"' EXIT

# call METHOD PATH [curl args...]: prints the status code; the body lands in $tmp/body and the
# response headers in $tmp/head. `Expect:` stops curl waiting for a 100-continue.
call() {
  method=$1 path=$2
  shift 2
  curl -sS --unix-socket "$api" -X "$method" -H 'Expect:' \
    -D "$tmp/head" -o "$tmp/body" -w '%{http_code}' "$@" "http://gantry$path"
}

# header NAME: that response header's value (names are case-insensitive).
header() {
  grep -i "^$1:" "$tmp/head" | head -n 1 | sed 's/^[^:]*:[[:space:]]*//' | tr -d '\r'
}

# The setup goes here; on failure, report it and exit non-zero:
#   call POST /v1/init/error -H 'Content-Type: application/json' \
#     --data-binary '{"type":"SetupError","message":"...","traceback":""}'
code=$(call POST /v1/ready --data-binary '') || exit 1
[ "$code" = 204 ] || { echo "runtime.sh: POST /v1/ready: $code" >&2; exit 1; }

while :; do
  code=$(call GET /v1/inputs/next) || exit 1
  case $code in
    200) ;;
    410) exit 0 ;; # drained: nothing is held between iterations, so exit now
    429) sleep 1; continue ;;
    *) echo "runtime.sh: GET /v1/inputs/next: $code" >&2; exit 1 ;;
  esac
  id=$(header Gantry-Input-Id)
  type=$(header Content-Type)
  mv "$tmp/body" "$tmp/input"
  if [ "$(head -c 5 "$tmp/input")" = "fail:" ]; then
    # The message as a JSON string: escape backslashes and quotes, newlines become spaces.
    msg=$(tail -c +6 "$tmp/input" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr '\n\r\t' '   ')
    code=$(call POST "/v1/inputs/$id/error" -H 'Content-Type: application/json' \
      --data-binary "{\"type\":\"EchoError\",\"message\":\"$msg\",\"traceback\":\"\"}") || exit 1
  else
    code=$(call POST "/v1/inputs/$id/response" -H "Content-Type: ${type:-application/octet-stream}" \
      --data-binary "@$tmp/input") || exit 1
  fi
  # 404: the input was cancelled meanwhile; nobody wants the answer.
  [ "$code" = 202 ] || [ "$code" = 404 ] || echo "runtime.sh: answering $id: $code" >&2
done
