# A small closure to try nixpush with, built offline from /bin/sh alone.
# `salt` makes fresh store paths (the post-build-hook fires only for new builds).
{ salt ? "demo" }:
let
  mk = name: script: builtins.derivation {
    inherit name salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
  greeting = mk "nixpush-demo-greeting" "echo 'hello from a binary cache' > $out";
in
mk "nixpush-demo" ''
  mkdir -p $out/bin
  printf '#!/bin/sh\ncat ${greeting}\n' > $out/bin/nixpush-demo
  chmod +x $out/bin/nixpush-demo
''
