// The "hello" deployment: what a subhoster's customer would write.
// Served by the origin as bundle layers (this file inline in boot's answer,
// lib/greet.ts as a separate layer) plus assets (static/hello.txt).
import { greet } from "./lib/greet.ts";

// From env.json, delivered to the isolate in the config's `envs`.
const greeting = Deno.env.get("GREETING") ?? "(GREETING is not set)";

Deno.serve(async (request: Request) => {
  const url = new URL(request.url);

  // A WebSocket echo, to show that upgrades go through relay and runner.
  if (url.pathname === "/ws" && request.headers.get("upgrade")?.toLowerCase() === "websocket") {
    const { socket, response } = Deno.upgradeWebSocket(request);
    socket.onmessage = (event) => socket.send(`echo: ${event.data}`);
    return response;
  }

  // An asset: read_tree tells the runner it exists, read_blob fetches it.
  const note = await Deno.readTextFile("static/hello.txt");

  console.log(`hello: ${request.method} ${request.url}`);
  return new Response(
    `${greet(greeting)}\n` +
      `request.url: ${request.url}\n` +
      `static/hello.txt: ${note.trim()}\n`,
    { headers: { "content-type": "text/plain; charset=utf-8" } },
  );
});
