// A second module: its own bundle layer at file:///src/lib/greet.ts.
export function greet(greeting: string): string {
  return `${greeting} from the hello deployment`;
}
