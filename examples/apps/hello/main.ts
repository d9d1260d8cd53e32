// The smallest deployment: `Deno.serve` with a handler.
Deno.serve((request: Request) => {
  const url = new URL(request.url);
  return new Response(`Hello from isocloud! You asked for ${url.pathname} on ${url.host}\n`);
});
