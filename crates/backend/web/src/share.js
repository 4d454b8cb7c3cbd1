// Share links: the language, code, input and arguments travel in the URL's fragment (never sent
// to the server, nothing stored there): `#language=python&code=<base64url>&stdin=…&args=…`.

function toBase64Url(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function fromBase64Url(text) {
  const b64 = text.replace(/-/g, "+").replace(/_/g, "/");
  const bin = atob(b64 + "===".slice((b64.length + 3) % 4));
  const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
  return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
}

/** The fragment (with its `#`) for a program. */
export function encodeShare({ language, code, stdin, args }) {
  const p = new URLSearchParams();
  p.set("language", language);
  p.set("code", toBase64Url(code));
  if (stdin) p.set("stdin", toBase64Url(stdin));
  if (args.length) p.set("args", toBase64Url(args.join("\n")));
  return "#" + p.toString();
}

/**
 * The program a fragment names: `null` when there is none, `{error}` when it is damaged,
 * else `{language, code, stdin, args}`.
 */
export function decodeShare(hash) {
  const p = new URLSearchParams(hash.replace(/^#/, ""));
  if (!p.has("language") || !p.has("code")) return null;
  try {
    const args = p.has("args") ? fromBase64Url(p.get("args")) : "";
    return {
      language: p.get("language"),
      code: fromBase64Url(p.get("code")),
      stdin: p.has("stdin") ? fromBase64Url(p.get("stdin")) : "",
      args: args ? args.split("\n") : [],
    };
  } catch (e) {
    return { error: "This link's program is damaged (it was cut short or edited), so it was not loaded." };
  }
}
