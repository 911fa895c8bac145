package upstream

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"time"
)

// ClientCertificate is an app registration's certificate credential: the
// private key signs a client assertion, the certificate's thumbprint names
// the key to Microsoft (Certificates & secrets > Certificates).
type ClientCertificate struct {
	Key  *rsa.PrivateKey
	Cert *x509.Certificate
}

// LoadClientCertificate reads a PEM file holding the certificate and its
// RSA private key (PKCS #8 or PKCS #1), in any order.
func LoadClientCertificate(path string) (*ClientCertificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	cc := &ClientCertificate{}
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		switch block.Type {
		case "CERTIFICATE":
			if cc.Cert == nil {
				if cc.Cert, err = x509.ParseCertificate(block.Bytes); err != nil {
					return nil, fmt.Errorf("certificate: %w", err)
				}
			}
		case "PRIVATE KEY":
			k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("private key: %w", err)
			}
			rk, ok := k.(*rsa.PrivateKey)
			if !ok {
				return nil, errors.New("the private key is not RSA: Microsoft takes RSA certificates for client assertions")
			}
			cc.Key = rk
		case "RSA PRIVATE KEY":
			if cc.Key, err = x509.ParsePKCS1PrivateKey(block.Bytes); err != nil {
				return nil, fmt.Errorf("private key: %w", err)
			}
		}
	}
	switch {
	case cc.Cert == nil:
		return nil, errors.New("no CERTIFICATE block in the file")
	case cc.Key == nil:
		return nil, errors.New("no RSA private key in the file (PRIVATE KEY or RSA PRIVATE KEY block)")
	case !cc.Key.PublicKey.Equal(cc.Cert.PublicKey):
		return nil, errors.New("the private key does not belong to the certificate")
	}
	return cc, nil
}

// Thumbprint is the certificate's SHA-1 thumbprint in hex, as the Azure
// portal shows it.
func (c *ClientCertificate) Thumbprint() string {
	sum := sha1.Sum(c.Cert.Raw)
	return hex.EncodeToString(sum[:])
}

// Assertion returns a signed client assertion (RFC 7523) for the token
// endpoint tokenURL: a JWT of ten minutes, RS256, with the certificate's
// SHA-1 thumbprint as x5t, as Microsoft's identity platform requires.
func (c *ClientCertificate) Assertion(clientID, tokenURL string, now time.Time) (string, error) {
	thumb := sha1.Sum(c.Cert.Raw)
	header, _ := json.Marshal(map[string]string{"alg": "RS256", "typ": "JWT", "x5t": base64.RawURLEncoding.EncodeToString(thumb[:])})
	jti := make([]byte, 16)
	rand.Read(jti)
	claims, _ := json.Marshal(map[string]any{
		"aud": tokenURL, "iss": clientID, "sub": clientID, "jti": hex.EncodeToString(jti),
		"nbf": now.Unix(), "iat": now.Unix(), "exp": now.Add(10 * time.Minute).Unix(),
	})
	signed := base64.RawURLEncoding.EncodeToString(header) + "." + base64.RawURLEncoding.EncodeToString(claims)
	digest := sha256.Sum256([]byte(signed))
	sig, err := rsa.SignPKCS1v15(rand.Reader, c.Key, crypto.SHA256, digest[:])
	if err != nil {
		return "", fmt.Errorf("sign client assertion: %w", err)
	}
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}
