# The "small paths" set of nixpush's benchmark: `layers` × `width` small outputs with dense
# references, plus a root referring to the whole top layer, built offline with
# builtins.derivation and /bin/sh alone (one build per layer, so building 4,001 paths takes
# seconds, not one derivation per path).
#
#   layer 0      `width` outputs (o0 … o{width-1}), no references
#   layer k > 0  output oj mentions, hence refers to, 3 distinct outputs of layer k-1: oj itself
#                (so every output of layer k-1 is in the closure) and 2 picked from the salt
#   root         a file naming every output of the top layer
#
# Each output is a directory holding one file `data` of 256 B to 4 KiB (size and filler text
# from the salt; see small.awk). `salt` keeps quick and full runs (and anyone else's) apart.
{ salt, layers ? "4", width ? "1000" }:
let
  nLayers = builtins.fromJSON layers;
  n = builtins.fromJSON width;
  outs = builtins.genList (j: "o${toString j}") n;
  mk = attrs: builtins.derivation ({
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    inherit salt;
  } // attrs);

  # All the outputs of layer k-1 go in as one file (passAsFile: 1,000 store paths are more than
  # one argument or environment variable may hold); the builder picks 3 for each output.
  layer = k: prev: mk {
    name = "np-bench-small-L${toString k}";
    outputs = outs;
    layer = toString k;
    inherit width;
    prev = if prev == null then "" else
      builtins.concatStringsSep "\n" (map (o: prev.${o}) outs) + "\n";
    passAsFile = [ "prev" ];
    args = [ "-c" ''
      set -eu
      awk 'BEGIN { for (j = 0; j < ${width}; j++) print ENVIRON["o" j] }' | xargs mkdir
      seed=$(printf '%s' "$salt" | cksum | cut -d' ' -f1)
      awk -v seed="$seed" -v layer="$layer" -v width="$width" -f ${./small.awk}
    '' ];
  };
  ls = builtins.genList (k: layer k (if k == 0 then null else builtins.elemAt ls (k - 1))) nLayers;
  top = builtins.elemAt ls (nLayers - 1);
in
{
  small = mk {
    name = "np-bench-small-root";
    top = builtins.concatStringsSep "\n" (map (o: top.${o}) outs) + "\n";
    passAsFile = [ "top" ];
    args = [ "-c" ''cp "$topPath" "$out"'' ];
  };
}
