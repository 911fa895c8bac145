//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"

	"mailbridge/upstream"
)

// A test binary started by startFloorRelay is the floor relay, not tests.
func init() {
	if os.Getenv("FLOOR_UPSTREAM") != "" {
		floorRelay()
	}
}

// floorRelay is the least a POP3 relay can do, run as its own process for
// BenchmarkServePOP3RelayCPU: log in to Outlook once, then copy bytes both
// ways with crypto/tls and nothing else.
func floorRelay() {
	up, err := (&upstream.POP3Dialer{Addr: os.Getenv("FLOOR_UPSTREAM")}).Dial(context.Background(), os.Getenv("FLOOR_MAILBOX"), os.Getenv("FLOOR_TOKEN"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("listen %s\n", ln.Addr())
	c, err := ln.Accept()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	io.WriteString(c, "+OK floor\r\n")
	go io.Copy(up.Conn, c)
	io.Copy(c, up.Reader)
	os.Exit(0)
}
