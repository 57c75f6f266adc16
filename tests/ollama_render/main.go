// ollama-render: renders chat requests through a Modelfile the way Ollama does, with Go's real text/template.
//
// It is a transcription (not a copy) of what Ollama does between a Modelfile and a prompt, written from reading
// ollama/ollama: parser/parser.go (ParseFile: commands, triple quotes without escapes, unprintable runes
// dropped), template/template.go (Parse with missingkey=zero and the json func; Execute on .Messages after
// collate), server/routes.go ChatHandler (SYSTEM prepended when the request does not start with a system
// message; filterThinkTags for the qwen3 family; think defaults to true for a thinking template) and
// thinking/template.go (InferTags: .Thinking inside range .Messages, between text nodes).
//
// stdin:  {"modelfile": "...", "arch": "qwen3", "cases": [{"messages": [{"role":..,"content":..,"thinking":..}], "think": null}]}
// stdout: {"template": .., "system": .., "stop": [..], "thinking": bool, "prompts": [..], "errors": [..]}
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/template"
	"text/template/parse"
	"unicode"
)

type Message struct {
	Role     string `json:"role"`
	Content  string `json:"content"`
	Thinking string `json:"thinking,omitempty"`
}

type Case struct {
	Messages []Message `json:"messages"`
	Think    *bool     `json:"think"`
}

type Input struct {
	Modelfile string `json:"modelfile"`
	Arch      string `json:"arch"`
	Cases     []Case `json:"cases"`
}

type Output struct {
	Template string    `json:"template"`
	System   *string   `json:"system"`
	Stop     []string  `json:"stop"`
	Thinking bool      `json:"thinking"`
	Prompts  []*string `json:"prompts"`
	Errors   []*string `json:"errors"`
}

type command struct{ name, args string }

// ---------------------------------------------------------------- Modelfile

func unquote(s string) (string, bool) {
	if strings.HasPrefix(s, `"""`) {
		if len(s) >= 6 && strings.HasSuffix(s, `"""`) {
			return s[3 : len(s)-3], true
		}
		return "", false
	}
	if strings.HasPrefix(s, `"`) {
		if len(s) >= 2 && strings.HasSuffix(s, `"`) {
			return s[1 : len(s)-1], true
		}
		return "", false
	}
	return s, true
}

func isSpace(r rune) bool   { return r == ' ' || r == '\t' }
func isNewline(r rune) bool { return r == '\r' || r == '\n' }
func isAlpha(r rune) bool   { return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' }

// parseModelfile reads commands: NAME VALUE, where a value runs to the first line end after which the value read
// so far (trimmed) unquotes; "# ..." lines are comments; PARAMETER takes a name before its value.
func parseModelfile(text string) ([]command, error) {
	var cmds []command
	runes := []rune(text + "\n")
	i := 0
	for i < len(runes) {
		r := runes[i]
		switch {
		case isSpace(r) || isNewline(r):
			i++
			continue
		case r == '#':
			for i < len(runes) && !isNewline(runes[i]) {
				i++
			}
			continue
		}
		start := i
		for i < len(runes) && isAlpha(runes[i]) {
			i++
		}
		name := strings.ToLower(string(runes[start:i]))
		if i >= len(runes) || !isSpace(runes[i]) {
			return nil, fmt.Errorf("bad command at rune %d: %q", start, string(runes[start:i+1]))
		}
		i++
		switch name {
		case "from", "license", "template", "system", "adapter", "message":
		case "parameter":
			ps := i
			for i < len(runes) && (isAlpha(runes[i]) || runes[i] >= '0' && runes[i] <= '9' || runes[i] == '_') {
				i++
			}
			if i >= len(runes) || !isSpace(runes[i]) {
				return nil, errors.New("bad parameter")
			}
			name = string(runes[ps:i])
			i++
		default:
			return nil, fmt.Errorf("unknown command %q", name)
		}
		var b strings.Builder
		done := false
		for ; i < len(runes); i++ {
			r := runes[i]
			if isNewline(r) {
				if s, ok := unquote(strings.TrimSpace(b.String())); ok {
					cmds = append(cmds, command{name, s})
					done = true
					i++
					break
				}
				b.WriteRune(r)
			} else if isSpace(r) || strconv.IsPrint(r) {
				b.WriteRune(r)
			}
		}
		if !done {
			return nil, fmt.Errorf("unterminated value of %s", name)
		}
	}
	return cmds, nil
}

// ---------------------------------------------------------------- template analysis

func identifiers(n parse.Node) []string {
	var out []string
	switch n := n.(type) {
	case *parse.ListNode:
		if n != nil {
			for _, c := range n.Nodes {
				out = append(out, identifiers(c)...)
			}
		}
	case *parse.ActionNode:
		out = identifiers(n.Pipe)
	case *parse.TemplateNode:
		out = identifiers(n.Pipe)
	case *parse.IfNode:
		out = branchIdentifiers(&n.BranchNode)
	case *parse.RangeNode:
		out = branchIdentifiers(&n.BranchNode)
	case *parse.WithNode:
		out = branchIdentifiers(&n.BranchNode)
	case *parse.PipeNode:
		if n != nil {
			for _, c := range n.Cmds {
				for _, a := range c.Args {
					out = append(out, identifiers(a)...)
				}
			}
		}
	case *parse.FieldNode:
		out = n.Ident
	case *parse.VariableNode:
		out = n.Ident
	}
	return out
}

func branchIdentifiers(b *parse.BranchNode) []string {
	out := identifiers(b.Pipe)
	out = append(out, identifiers(b.List)...)
	if b.ElseList != nil {
		out = append(out, identifiers(b.ElseList)...)
	}
	return out
}

func hasVar(t *template.Template, name string) bool {
	for _, id := range identifiers(t.Tree.Root) {
		if strings.EqualFold(id, name) {
			return true
		}
	}
	return false
}

// thinkingTags: the text nodes around the first .Thinking inside a range over .Messages.
func thinkingTags(t *template.Template) (string, string) {
	var open, close string
	var walk func(n parse.Node, inMessages bool, list *parse.ListNode) bool
	walk = func(n parse.Node, inMessages bool, list *parse.ListNode) bool {
		switch x := n.(type) {
		case *parse.ListNode:
			if x == nil {
				return false
			}
			for _, c := range x.Nodes {
				if walk(c, inMessages, x) {
					return true
				}
			}
		case *parse.IfNode:
			return walkBranch(walk, &x.BranchNode, inMessages)
		case *parse.WithNode:
			return walkBranch(walk, &x.BranchNode, inMessages)
		case *parse.RangeNode:
			overMessages := false
			for _, id := range identifiers(x.Pipe) {
				overMessages = overMessages || id == "Messages"
			}
			return walkBranch(walk, &x.BranchNode, overMessages)
		case *parse.ActionNode:
			for _, id := range identifiers(x.Pipe) {
				if id == "Thinking" && inMessages && list != nil {
					if tn, ok := list.Nodes[0].(*parse.TextNode); ok {
						open = strings.TrimSpace(string(tn.Text))
					}
					if tn, ok := list.Nodes[len(list.Nodes)-1].(*parse.TextNode); ok {
						close = strings.TrimSpace(string(tn.Text))
					}
					return true
				}
			}
		}
		return false
	}
	walk(t.Tree.Root, false, nil)
	return open, close
}

func walkBranch(walk func(parse.Node, bool, *parse.ListNode) bool, b *parse.BranchNode, in bool) bool {
	if walk(b.List, in, nil) {
		return true
	}
	return b.ElseList != nil && walk(b.ElseList, in, nil)
}

// ---------------------------------------------------------------- rendering

func stripThinking(content string) string {
	trimmed := strings.TrimLeftFunc(content, unicode.IsSpace)
	if !strings.HasPrefix(trimmed, "<think>") {
		return content
	}
	after := trimmed[len("<think>"):]
	if i := strings.Index(after, "</think>"); i >= 0 {
		return strings.TrimLeftFunc(after[i+len("</think>"):], unicode.IsSpace)
	}
	return ""
}

func render(t *template.Template, thinking bool, system string, arch string, c Case) (string, error) {
	msgs := append([]Message(nil), c.Messages...)
	if system != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: system}}, msgs...)
	}
	if arch == "qwen3" {
		last := -1
		for i, m := range msgs {
			if m.Role == "user" {
				last = i
			}
		}
		for i := range msgs {
			if msgs[i].Role == "assistant" && i < last {
				msgs[i].Content = stripThinking(msgs[i].Content)
			}
		}
	}
	think := c.Think
	if thinking && think == nil {
		on := true
		think = &on
	}
	if !thinking && think != nil && *think {
		return "", errors.New("the model does not support thinking")
	}
	var systems []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			systems = append(systems, msgs[i].Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[n-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	var b bytes.Buffer
	err := t.Execute(&b, map[string]any{
		"System": strings.Join(systems, "\n\n"), "Messages": collated, "Tools": nil, "Response": "",
		"Think": think != nil && *think, "IsThinkSet": think != nil, "Query": "", "Document": "", "Instruction": "",
	})
	return b.String(), err
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "ollama-render:", err)
	os.Exit(1)
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fail(err)
	}
	cmds, err := parseModelfile(in.Modelfile)
	if err != nil {
		fail(err)
	}
	var out Output
	out.Stop = []string{}
	hasFrom := false
	for _, c := range cmds {
		switch c.name {
		case "from":
			hasFrom = true
		case "template":
			out.Template = c.args
		case "system":
			s := c.args
			out.System = &s
		case "stop":
			out.Stop = append(out.Stop, c.args)
		}
	}
	if !hasFrom {
		fail(errors.New("no FROM line"))
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(out.Template)
	if err != nil {
		fail(err)
	}
	if !hasVar(t, "messages") {
		fail(errors.New("the template does not use .Messages (Ollama would render it the legacy way)"))
	}
	open, close := thinkingTags(t)
	out.Thinking = open != "" && close != ""
	system := ""
	if out.System != nil {
		system = *out.System
	}
	for _, c := range in.Cases {
		p, err := render(t, out.Thinking, system, in.Arch, c)
		if err != nil {
			e := err.Error()
			out.Prompts, out.Errors = append(out.Prompts, nil), append(out.Errors, &e)
		} else {
			out.Prompts, out.Errors = append(out.Prompts, &p), append(out.Errors, nil)
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail(err)
	}
}
