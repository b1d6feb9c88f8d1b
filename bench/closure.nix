# nixpush benchmark closures, built offline with builtins.derivation and /bin/sh alone.
# bench/run writes `spec` (JSON: the list of data paths, their kind, size and references);
# `salt` keeps quick and full runs (and anyone else's paths) apart.
#
#   main  a root referring to every data path (the closure pushed for throughput)
#   big   one very large path (peak memory)
#   noop  a root referring to `noopCount` tiny paths (no-op re-push)
{ salt, spec ? ''{"paths":[]}'', bigSize ? "0", noopCount ? "1000" }:
let
  s = builtins.fromJSON spec;
  mk = attrs: builtins.derivation ({
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    inherit salt;
  } // attrs);
  gen = attrs: mk (attrs // { args = [ ./gen.sh ]; });

  nodes = builtins.genList (i:
    let p = builtins.elemAt s.paths i; in
    gen {
      inherit (p) name kind seed;
      size = toString p.size;
      deps = map (j: builtins.elemAt nodes j) p.deps;
    }) (builtins.length s.paths);

  n = builtins.fromJSON noopCount;
  outs = builtins.genList (i: "o${toString i}") n;
  # One build, `n` outputs: every tenth output is referred to by the next ten.
  tiny = mk {
    name = "np-bench-tiny";
    outputs = outs;
    args = [ "-c" ''
      i=0; prev=
      while [ $i -lt ${toString n} ]; do
        eval "o=\$o$i"
        mkdir -p "$o"
        echo "tiny path $i" > "$o/data"
        if [ -n "$prev" ]; then echo "$prev" > "$o/dep"; fi
        if [ $((i % 10)) -eq 0 ]; then prev=$o; fi
        i=$((i + 1))
      done
    '' ];
  };
in
{
  main = gen { name = "np-bench-root"; kind = "root"; size = "0"; seed = "root"; deps = nodes; };
  big = gen { name = "np-bench-big"; kind = "big"; size = bigSize; seed = "big"; deps = [ ]; };
  noop = mk {
    name = "np-bench-noop-root";
    args = [ "-c" "echo ${toString (map (o: tiny.${o}) outs)} > $out" ];
  };
}
