// HS256 JSON Web Tokens with nothing but Web Crypto (`crypto.subtle`).
//
// Shared by relay.ts (which signs `x-deno-subhost` tokens) and origin.ts
// (which verifies the runner's `Authorization: Bearer` tokens). No imports:
// this is the whole of the JWT handling a subhoster needs.

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Seconds of clock skew tolerated on `exp`, `nbf` and `iat`. */
export const CLOCK_LEEWAY_S = 10;

/** Longer tokens are refused before any work is done on them. */
const MAX_TOKEN_BYTES = 8 * 1024;

export function base64urlEncode(bytes: Uint8Array): string {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

export function base64urlDecode(text: string): Uint8Array<ArrayBuffer> {
  if (!/^[A-Za-z0-9_-]*$/.test(text)) throw new JwtError("malformed token: not base64url");
  const base64 = text.replaceAll("-", "+").replaceAll("_", "/") + "===".slice((text.length + 3) % 4);
  let binary: string;
  try {
    binary = atob(base64);
  } catch {
    throw new JwtError("malformed token: not base64url");
  }
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

/** Why a token was refused; the message is safe to show the caller. */
export class JwtError extends Error {}

const keys = new Map<string, Promise<CryptoKey>>();

/** The HMAC-SHA-256 key for a shared secret (its UTF-8 bytes), imported once. */
function hmacKey(secret: string): Promise<CryptoKey> {
  let key = keys.get(secret);
  if (!key) {
    key = crypto.subtle.importKey(
      "raw",
      encoder.encode(secret),
      { name: "HMAC", hash: "SHA-256" },
      false,
      ["sign", "verify"],
    );
    keys.set(secret, key);
  }
  return key;
}

export type Claims = Record<string, unknown>;

/** Signs `claims` as an HS256 JWT with header `{"alg":"HS256","typ":"JWT","kid":kid}`. */
export async function signHs256(kid: string, secret: string, claims: Claims): Promise<string> {
  const header = { alg: "HS256", typ: "JWT", kid };
  const signingInput = base64urlEncode(encoder.encode(JSON.stringify(header))) + "." +
    base64urlEncode(encoder.encode(JSON.stringify(claims)));
  const signature = await crypto.subtle.sign("HMAC", await hmacKey(secret), encoder.encode(signingInput));
  return signingInput + "." + base64urlEncode(new Uint8Array(signature));
}

function decodeJsonPart(part: string, what: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(decoder.decode(base64urlDecode(part)));
  } catch (e) {
    if (e instanceof JwtError) throw e;
    throw new JwtError(`malformed token: ${what} is not JSON`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new JwtError(`malformed token: ${what} is not a JSON object`);
  }
  return value as Record<string, unknown>;
}

export interface Verified {
  kid: string;
  claims: Claims;
}

/**
 * Verifies an HS256 JWT against the secrets known per `kid`.
 *
 * Checks, in order: shape, `alg` is exactly HS256 (so `none` is refused),
 * `kid` names a known secret (a token without `kid` is accepted only when
 * there is exactly one secret), the signature (compared in constant time by
 * `crypto.subtle.verify`), then `exp` (required, not past), `nbf` and `iat`
 * (not in the future), all with a small leeway.
 */
export async function verifyHs256(
  token: string,
  secrets: Map<string, string>,
  nowS = Math.floor(Date.now() / 1000),
): Promise<Verified> {
  if (token.length > MAX_TOKEN_BYTES) throw new JwtError("malformed token: too long");
  const parts = token.split(".");
  if (parts.length !== 3) throw new JwtError("malformed token: expected three dot-separated parts");
  const [headerPart, claimsPart, signaturePart] = parts;
  const header = decodeJsonPart(headerPart, "header");
  if (header.alg !== "HS256") {
    throw new JwtError(`unsupported JWT algorithm ${JSON.stringify(header.alg)}: only HS256 is accepted`);
  }
  let kid: string;
  if (typeof header.kid === "string") {
    kid = header.kid;
  } else if (header.kid === undefined && secrets.size === 1) {
    kid = [...secrets.keys()][0];
  } else {
    throw new JwtError("the token has no (string) kid");
  }
  const secret = secrets.get(kid);
  if (secret === undefined) throw new JwtError(`unknown kid ${JSON.stringify(kid.slice(0, 64))}`);
  const ok = await crypto.subtle.verify(
    "HMAC",
    await hmacKey(secret),
    base64urlDecode(signaturePart),
    encoder.encode(headerPart + "." + claimsPart),
  );
  if (!ok) throw new JwtError("the token's signature does not verify");
  const claims = decodeJsonPart(claimsPart, "claims");
  if (typeof claims.exp !== "number") throw new JwtError("the token has no numeric exp claim");
  if (nowS > claims.exp + CLOCK_LEEWAY_S) throw new JwtError("the token has expired");
  for (const name of ["nbf", "iat"]) {
    const value = claims[name];
    if (value === undefined) continue;
    if (typeof value !== "number") throw new JwtError(`claim ${name} is not a number`);
    if (value > nowS + CLOCK_LEEWAY_S) throw new JwtError("the token is not valid yet (nbf or iat is in the future)");
  }
  return { kid, claims };
}

/**
 * Parses `KID=SECRET` (the form of `--secret` and of `$SUBHOST_SECRET`).
 * Throws on a missing `=` or an empty side.
 */
export function parseSecret(value: string): [kid: string, secret: string] {
  const at = value.indexOf("=");
  if (at <= 0 || at === value.length - 1) {
    // The value is not echoed: it may be a secret typed without its kid.
    throw new Error("expected KID=SECRET (a non-empty kid, '=', a non-empty secret)");
  }
  return [value.slice(0, at), value.slice(at + 1)];
}
