#!/usr/bin/env bash
# Spark 4 needs Java 17 or newer on PATH (or JAVA_HOME).
set -euo pipefail
java_bin=java
[ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ] && java_bin="$JAVA_HOME/bin/java"
if ! command -v "$java_bin" >/dev/null 2>&1; then
  echo "userlens: Java 17+ is required by Spark 4 but 'java' was not found; install a JDK 17 (e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME" >&2
  exit 1
fi
version=$("$java_bin" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
major=${version%%.*}
[ "$major" = "1" ] && major=$(echo "$version" | cut -d. -f2)
if [ -z "$major" ] || [ "$major" -lt 17 ] 2>/dev/null; then
  echo "userlens: Java 17+ is required by Spark 4, found '${version:-unknown}' ($java_bin); install a JDK 17 or point JAVA_HOME at one" >&2
  exit 1
fi
