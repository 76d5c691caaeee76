// Command etcd runs a one-member etcd with go.etcd.io/etcd/server/v3/embed, at the version
// k8s.io/kubernetes requires, for the test control plane (tests/support/control_plane.py).
// It takes the few flags the suite needs and stops on SIGTERM or SIGINT.
package main

import (
	"flag"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

func urls(value string) []url.URL {
	parsed, err := url.Parse(value)
	if err != nil {
		log.Fatalf("bad URL %q: %v", value, err)
	}
	return []url.URL{*parsed}
}

func main() {
	dataDir := flag.String("data-dir", "etcd-data", "where etcd keeps its data")
	client := flag.String("listen-client-urls", "http://127.0.0.1:2379", "client URL")
	peer := flag.String("listen-peer-urls", "http://127.0.0.1:2380", "peer URL")
	quotaBytes := flag.Int64("quota-backend-bytes", 2<<30, "backend size quota")
	flag.Parse()

	cfg := embed.NewConfig()
	cfg.Name = "kubetune-test"
	cfg.Dir = *dataDir
	cfg.ListenClientUrls = urls(*client)
	cfg.AdvertiseClientUrls = urls(*client)
	cfg.ListenPeerUrls = urls(*peer)
	cfg.AdvertisePeerUrls = urls(*peer)
	cfg.InitialCluster = cfg.Name + "=" + *peer
	cfg.QuotaBackendBytes = *quotaBytes
	cfg.LogLevel = "warn"
	// Tests care about correctness, not durability across power loss.
	cfg.UnsafeNoFsync = true

	server, err := embed.StartEtcd(cfg)
	if err != nil {
		log.Fatalf("etcd did not start: %v", err)
	}
	select {
	case <-server.Server.ReadyNotify():
		log.Printf("etcd ready at %s", *client)
	case <-time.After(60 * time.Second):
		server.Close()
		log.Fatal("etcd was not ready within 60 s")
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-stop:
	case err := <-server.Err():
		log.Printf("etcd failed: %v", err)
	}
	server.Close()
}
