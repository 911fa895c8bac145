package main

import (
	"context"
	"path/filepath"
	"testing"
)

func TestServiceConfig(t *testing.T) {
	sc, err := serviceConfig("mailbridge.toml")
	if err != nil {
		t.Fatal(err)
	}
	if len(sc.Arguments) != 3 || sc.Arguments[0] != "serve" || sc.Arguments[1] != "-config" || !filepath.IsAbs(sc.Arguments[2]) {
		t.Errorf("arguments %q: want serve -config with an absolute path", sc.Arguments)
	}
	for k, want := range map[string]any{"StartType": "automatic", "OnFailure": "restart", "Restart": "on-failure", "ReloadSignal": "HUP"} {
		if sc.Option[k] != want {
			t.Errorf("option %s = %v, want %v", k, sc.Option[k], want)
		}
	}
}

func TestServiceProgramStopsLikeSIGTERM(t *testing.T) {
	stopped := make(chan struct{})
	p := &program{run: func(ctx context.Context) int {
		<-ctx.Done() // what runBridge does: Run returns when ctx ends
		close(stopped)
		return 0
	}}
	if err := p.Start(nil); err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(nil); err != nil {
		t.Fatal(err)
	}
	select {
	case <-stopped:
	default:
		t.Fatal("Stop returned before the bridge stopped")
	}
}
