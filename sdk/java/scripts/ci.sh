#!/usr/bin/env bash
# CI for the Java SDK: builds the SDK and agent (agent build), compiles and runs the
# JUnit 5 unit tests offline (Debian's junit5 jars), and checks that the Maven build
# of pom.xml (stub generation included) passes offline against /usr/share/maven-repo.
set -euo pipefail
SDK="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="$(cd "$SDK/../.." && pwd)"
OUT="$ROOT/target/sdk-java"
J=/usr/share/java

"$SDK/conformance/agent" build

# Doc comments on every public type and member, and the example compiles.
rm -rf "$OUT/doclint" && mkdir -p "$OUT/doclint"
javac -Xdoclint:all/protected -encoding UTF-8 --release 17 -d "$OUT/doclint" \
  -cp "$(cat "$OUT/classpath"):$J/geronimo-annotation-1.3-spec.jar" \
  $(find "$SDK/src/main/java" -name '*.java') "$SDK/examples/Quickstart.java" >"$OUT/doclint.log" 2>&1 || true
if grep -E "error:|warning: no comment" "$OUT/doclint.log"; then
  echo "java SDK: doclint failed" >&2
  exit 1
fi

# Unit tests.
rm -rf "$OUT/test-classes" && mkdir -p "$OUT/test-classes"
CP="$(cat "$OUT/classpath")"
javac -nowarn -encoding UTF-8 --release 17 -d "$OUT/test-classes" \
  -cp "$CP:$J/junit-jupiter-api.jar:$J/apiguardian-api.jar:$J/opentest4j.jar" \
  $(find "$SDK/src/test/java" -name '*.java')
java -jar "$J/junit-platform-console-standalone.jar" --disable-banner --details=summary \
  -cp "$OUT/test-classes:$CP" --select-package dev.chime.sdk --fail-if-no-tests

# The Maven build users run (offline: every repository mirrors file:///usr/share/maven-repo).
if [ "${SKIP_MAVEN:-0}" != 1 ]; then
  (cd "$SDK" && mvn -B -q -Dstyle.color=never -s settings.xml package)
fi
echo "java SDK: ok"
